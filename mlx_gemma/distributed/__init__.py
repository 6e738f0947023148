"""Running one Gemma across several processes on mx.distributed: pipeline and tensor parallel."""
