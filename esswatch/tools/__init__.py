"""Tools that read what the watch wrote or measure a checkpoint offline: ``esswatch report``
(:mod:`.report`, reading TensorBoard event files through :mod:`.events`) and
``esswatch profile`` (:mod:`.profile`)."""
