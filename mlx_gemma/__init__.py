"""mlx_gemma: Google's Gemma family on Apple's MLX."""

__version__ = "0.1.0"
