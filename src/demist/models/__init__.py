"""Networks: the autoencoders and DEMIST assembled from MONAI parts."""
