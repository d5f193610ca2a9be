"""The Ray shells: thin actor classes and ray.remote factories over the plain classes in cluster/
(this package imports cluster/; cluster/ never imports it)."""
