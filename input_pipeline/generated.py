"""Generated JPEG triplets held in memory, for benchmarks and smoke runs.

Not a dataset: random smooth images with file sizes like real vehicle crops,
so that decoding costs what it costs on real data. Reading a real split needs
a prepared TFDS dataset; this needs nothing.
"""

import numpy as np
import tensorflow as tf

from input_pipeline import pipeline


def generated_split(num_ids: int, per_id: int, height: int, width: int,
                    seed: int = 0) -> pipeline.SplitData:
  """num_ids x per_id smooth random JPEG triplets of height x width.

  Cameras cycle over 8, flare ratios are uniform in [0, 0.2).
  """
  rng = np.random.default_rng(seed)
  n = num_ids * per_id
  images = {m: [] for m in pipeline.MODALITIES}
  for _ in range(n):
    for m in pipeline.MODALITIES:
      # Coarse noise upsampled plus fine noise: JPEG sizes close to photos.
      coarse = rng.uniform(0, 255, (height // 16, width // 16, 3))
      image = tf.image.resize(coarse, (height, width), method="bicubic").numpy()
      image += rng.normal(0, 12, (height, width, 3))
      image = np.clip(image, 0, 255).astype(np.uint8)
      images[m].append(tf.io.encode_jpeg(image, quality=90).numpy())
  return pipeline.SplitData(
      rgb=np.array(images["rgb"], dtype=object),
      ni=np.array(images["ni"], dtype=object),
      ti=np.array(images["ti"], dtype=object),
      pid=np.repeat(np.arange(num_ids), per_id),
      camid=np.arange(n) % 8, sceneid=np.full(n, -1),
      flare_ratio=rng.uniform(0, 0.2, (n, 2)),
      file=[f"generated/{i}.jpg" for i in range(n)])
