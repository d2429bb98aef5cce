"""Write tljax/data/imagenet_classes.tsv (index, WordNet synset, class names) from the ImageNet
label lists that TensorFlow Datasets ships (Apache-2.0): `imagenet2012/labels.txt` gives the
synsets in the sorted order Keras and TFDS use, `siscore/labels.py` the matching names.

    python scripts/make_imagenet_classes.py
"""

import ast
import importlib.util
import os

root = os.path.dirname(importlib.util.find_spec("tensorflow_datasets").origin)
with open(os.path.join(root, "datasets", "imagenet2012", "labels.txt")) as f:
    synsets = [line.strip() for line in f if line.strip()]
with open(os.path.join(root, "datasets", "siscore", "labels.py")) as f:
    tree = ast.parse(f.read())
names = next(
    ast.literal_eval(node.value) for node in tree.body
    if isinstance(node, ast.Assign) and node.targets[0].id == "IMAGENET_LABELS_LIST"
)
assert len(synsets) == len(names) == 1000
out = os.path.join(os.path.dirname(__file__), "..", "tljax", "data", "imagenet_classes.tsv")
with open(out, "w") as f:
    f.write("# index\tsynset\tnames (from tensorflow_datasets, Apache-2.0)\n")
    for i, (s, n) in enumerate(zip(synsets, names, strict=True)):
        f.write(f"{i}\t{s}\t{n}\n")
print(f"wrote {os.path.normpath(out)}")
