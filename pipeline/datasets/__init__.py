"""Lightning data modules and datasets over the stores: clips of features or frames, captioned clips, windows of frames, features or traffic grids, and the frame slices the features stage reads."""
