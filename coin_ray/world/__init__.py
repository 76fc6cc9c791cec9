"""Foggy-Shapes: a procedural street world with a clear source and a foggy target domain,
plus the stand-in cloud detector and stand-in CLIP trained on it (see DESIGN.md section 5).

Entry point: ``coin_ray.world.build.build_world(size, cache_dir=None, seed=0, cloud_confusion=FOGGY_SHAPES_CLOUD_CONFUSION) -> World``.
"""
