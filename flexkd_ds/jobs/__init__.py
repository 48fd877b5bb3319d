"""The jobs, one module each, named as their launch scripts: distill, score, evaluate, ablate, plan.

Each reads top to bottom: setup, loop, checkpoint, export. ``common`` holds what several jobs share.
"""
