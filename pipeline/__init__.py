"""Stage one: frozen backbones, sampled views and Zarr feature stores."""
