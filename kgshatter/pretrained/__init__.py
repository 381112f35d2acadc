"""Pretrained models: loading checkpoints as TransformerBridges and editing them on text.

- :mod:`~kgshatter.pretrained.loading`: ``load_pretrained`` (GPT-2, Llama, Mamba; a hub name or
  a local directory, offline), attention implementations, devices;
- :mod:`~kgshatter.pretrained.packaged`: real weights from the package index (SmolLM2-135M)
  and GGUF files, converted once into a cached checkpoint folder;
- :mod:`~kgshatter.pretrained.export`: edits as merged Hugging Face weights or a PEFT LoRA
  adapter;
- :mod:`~kgshatter.pretrained.text`: text edit requests' prompts and statistics (``TextTask``,
  ``TextCorpus``), the pretrained counterpart of ``SyntheticTask``;
- :mod:`~kgshatter.pretrained.facts`: naturalistic facts (months, days, city -> country) with
  the synthetic study's measurements;
- :mod:`~kgshatter.pretrained.mmlu` and :mod:`~kgshatter.pretrained.fluency`: general ability
  before and after an edit (MMLU-Redux, n-gram entropy of generations).

The studies that run these end to end live in :mod:`kgshatter.studies` (``months``).
"""
