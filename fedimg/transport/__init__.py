"""What travels between server and clients: Flower records (:mod:`.records`), packed arrays
(:mod:`.packing`), update codecs (:mod:`.codecs`), and the grid that moves them (:mod:`.grid`)."""
