"""Photos in: listing and decoding image files (:mod:`.decode`), the views a backbone sees
(:mod:`.views`: the crops and the released models' test-time views), each file's identity
(:mod:`.identity`) and decoding ahead of the model in threads (:mod:`.readahead`)."""
