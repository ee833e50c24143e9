"""Stories: clients of the library that tell one end-to-end story each: the synthetic EM model
organism (``stories.organism``) and the SmolLM2-135M demo (``stories.smollm2``).

May import: the whole library. Only ``saediff.cli`` (and the ``saediff`` facade) imports stories.
"""
