"""Students pruned from the teacher by importance (ShortGPT depth, Minitron width).

``arch``: what the slicer knows of each architecture family (GPT-2, Llama-style);
``importance``: one calibration pass scoring layers, MLP neurons, KV groups and hidden channels;
``slicing``: a plan of what to keep, and the student model cut from the teacher by it;
``search``: the student shape under a parameter budget, chosen by short healing runs;
``plan``: the stage entry point that resolves a ``StudentConfig`` into a plan, cached by content.
"""
