"""Writers of nnU-Net v2 raw datasets: converters of public data and generated phantoms."""
