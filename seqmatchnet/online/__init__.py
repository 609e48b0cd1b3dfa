"""Online relocalisation: the causal matcher ``Localizer`` (one query frame at a time) and the
binary stream format of live descriptors.
"""
