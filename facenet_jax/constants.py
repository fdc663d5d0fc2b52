"""Names shared by the model, the losses and the input pipeline.

Modalities are data, not code: everything that loops over streams loops over
these tuples, and the order here is the order of the embedding segments.
"""

# The three spectra of a triplet, in embedding order [RGB | NI | TI].
MODALITIES = ("rgb", "ni", "ti")
# The flare-susceptible spectra: masks, SMP heads and FCE exist for these only.
FLARE_MODALITIES = ("rgb", "ni")
# The flare-immune spectrum that FCE borrows features from.
GUIDE_MODALITY = "ti"
