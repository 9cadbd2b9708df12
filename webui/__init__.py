"""The local web page (``didp ui``): a form built from the request model, a run watched as it goes.

``form``, ``runs`` and ``view`` are plain Python; only ``page`` imports Gradio (the ``ui`` extra).
"""
