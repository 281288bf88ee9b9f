"""The living gallery: a store of image vectors with labels, metadata and the images themselves,
added to and removed from while the service runs (see ``docs/gallery.md``)."""
