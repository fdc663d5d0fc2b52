"""Training and evaluation of a run, one responsibility per module.

  loop         train_and_evaluate: the loop, read top to bottom
  build        model, loss config, schedule and optimizer from the config
  steps        the pure loss, train and embed steps
  train_state  the state; scratch, ImageNet weights, warm start, restore
  mesh         the device mesh, host <-> device transfers
  feed         splits, input caching, host -> device prefetch
  extract      what evaluation feeds the network, and its embeddings
  evaluate     ranking, results files, --mode eval

Nothing is re-exported: import the module you need, so that importing
`steps` or `mesh` does not load TensorFlow (`feed` does).
"""
