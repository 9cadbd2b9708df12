"""CLIP and the device it runs on: shared by the prior (``prior``) and the visualiser (``dip``)."""
