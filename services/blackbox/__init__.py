"""The black-box service: the trained CNN behind POST /predict, revealing predictions only and counting every image."""
