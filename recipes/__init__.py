"""The Hydra config tree (installed as ``one_peace.recipes``): ``model/*.yaml`` sizes, recipes, data, objectives."""
