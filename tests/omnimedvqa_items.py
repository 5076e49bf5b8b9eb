"""Three items of each of Table IV's four OmniMedVQA sets in the release's layout (QA_information/Open-access/
<set>.json, Images/<set>/<n>.png), images of noise: tools/reproduce.py --dry-run prepares them with the real preparer.

    python tests/omnimedvqa_items.py runs/omnimedvqa   # then: python data/omnimedvqa/prepare.py --root runs/omnimedvqa
"""

import json
import os
import sys

import numpy as np
from PIL import Image

OMNI_FIXTURE = {  # OmniMedVQA set -> (question, options), three items each, the answer moving through them
    "Chest CT Scan": ("Which finding does this chest CT show?", ["Adenocarcinoma", "Large cell carcinoma", "Normal"]),
    "ISIC2020": ("What is the diagnosis of this skin lesion?", ["Benign", "Melanoma"]),
    "Retinal OCT-C8": ("Which retinal disease does this OCT image show?", ["AMD", "CNV", "DME", "Normal"]),
    "Diabetic Retinopathy": ("What grade of diabetic retinopathy is shown?", ["No DR", "Mild", "Moderate", "Severe"]),
}


def build(root: str) -> str:
    """QA_information/Open-access/<set>.json and Images/<set>/<n>.png under root, as the release holds them."""
    os.makedirs(os.path.join(root, "QA_information", "Open-access"), exist_ok=True)
    for k, (name, (question, options)) in enumerate(OMNI_FIXTURE.items()):
        items = []
        for n in range(3):
            image = f"Images/{name}/{n}.png"
            os.makedirs(os.path.dirname(os.path.join(root, image)), exist_ok=True)
            pixels = np.random.default_rng(10 * k + n).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, image))
            items.append({"dataset": name, "question_id": f"{k}_{n}", "question_type": "Disease Diagnosis",
                          "question": question, "gt_answer": options[n % len(options)], "image_path": image,
                          **{f"option_{'ABCD'[i]}": o for i, o in enumerate(options)}})
        with open(os.path.join(root, "QA_information", "Open-access", f"{name}.json"), "w") as f:
            json.dump(items, f, indent=1)
    return root


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "omnimedvqa"))
