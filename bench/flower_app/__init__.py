"""Flower's side of `bench.vs_flower`: the Flower App both engines run (`app/`) and the
launcher of Flower's deployment engine on one machine (`deployment`)."""
