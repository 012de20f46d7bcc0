"""Built-in modality plugins (installed as ``one_peace.adapters``): text, image, audio, video."""
