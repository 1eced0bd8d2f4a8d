"""Everything between the raw dataset and a training batch: tables, study/patient identity, folds, decoding, the image cache, row files, the dataset and samplers."""
