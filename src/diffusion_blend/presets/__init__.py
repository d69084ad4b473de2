"""Built-in settings: small real models shipped inside the package, so the main job runs anywhere."""
