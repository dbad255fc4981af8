"""The benchmark harness behind ``armor bench`` and ``benchmarks/``: random pruned layers, layer timing
(:mod:`.layers`), model decode timing (:mod:`.models`) and process memory (:mod:`.memory`).  It sits above the
runtime and below the CLI; it returns records, the CLI formats them."""
