"""Running what the graph pass produced: the saved-folder format (:mod:`.folder`), saving
(:mod:`.save`) and loading (:mod:`.load`) folders, their programs (:mod:`.programs`) and weights
(:mod:`.weightfiles`), AOTInductor packages (:mod:`.compiled`), the KV-cache program and
generation (:mod:`.generate`)."""
