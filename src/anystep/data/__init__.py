"""The data layer of the real Wan2.1 path: video/caption sources, the latent cache and teacher data.

* ``text``: UMT5 prompt embeddings exactly as ``WanPipeline`` computes them, and Wan's negative prompt.
* ``video_io``: (video, caption) sources (a folder of mp4 files or webdataset-style tar shards) and decoding.
* ``latent_cache``: the on-disk latent cache format (``ShardWriter``, ``LatentCache``).
* ``encode``: ``cache_videos``, real videos encoded into normalised VAE latents + prompt embeddings.
* ``synthesize``: ``synthesize``, teacher-generated prompt-video pairs in the same format (the paper's data).
"""
