"""The client side of a run: the Flower ClientApp's thin handlers (:mod:`.app`) over the
plain-PyTorch task environment (:mod:`.environment`), and a deployed site's options (:mod:`.site`)."""
