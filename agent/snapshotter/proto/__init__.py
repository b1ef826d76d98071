"""containerd's snapshots API messages: our .proto files and the modules generated from them."""
