"""The data: TFDS builders, the grain input pipeline, the one image reader.

  datasets/     TFDS builders (synthetic_mri, brain_tumor_coco,
                segmentation_folder), preparation, catalogue, transforms
  pipeline.py   grain iterators of augmented / evaluation batches
  sources.py    reading prepared splits: (image, mask) pairs, case ids, sizes
  patches.py    native-resolution training crops and validation tiles
  folds.py      k-fold cross-validation splits (nnU-Net's splits layout)
  whole_images.py  images at their own size for the sliding window
  image_io.py   reading an image or mask file, for the builders and predict.py

Imports nothing of the model, training or evaluation
(tests/test_dependencies.py); importing it does not import TensorFlow.
"""
