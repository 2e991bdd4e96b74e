"""Tiny models of the real architectures (`models`) and their pre-trained bases (`pretrain`), built
offline."""
