"""Ready pipelines for methods that change the sampling loop (A-STAR, UAM, IR-Diffusion, DeContext)."""
