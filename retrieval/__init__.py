"""Search over a folder of the user's own images: CLIP image embeddings in a FAISS index.

- ``sources``: what ``didp index`` reads (a folder of images, recursively, or Parquet with a path
  or URL column), as rows of id and source;
- ``images``: one item read and checked (``pipeline.media.load_image``), its thumbnail, and a
  batch of pictures embedded by CLIP's image tower;
- ``store``: the index directory (manifest, shards, the FAISS index, items and thumbnails), how
  the index is built (exact, or IVF above ``EXACT_MAX`` items) and opened memory-mapped;
- ``query``: an opened index searched with a query embedding, and a ``.npy`` query checked;
- ``sheet``: the contact sheet of the top matches' thumbnails.

FAISS (``faiss-cpu``, the ``search`` extra) is imported only where an index is built or opened.
"""
