"""Ten pathology questions in PathMMU's data.json format, with explanations written as pathologists reason
(what the image shows, the other options set aside, the knowledge that decides), for auditing a judge on
PathMMU-format data without the gated dataset. The images are noise: a judge with no image facts cannot
check them, which is what the audit's swapped_image row shows for such data.

    python tests/pathology_items.py runs/pathology      # -> data.json + images.zip, then:
    python data/pathmmu/prepare.py --data-json runs/pathology/data.json --images runs/pathology/images.zip \\
        --subsets PubMed --out runs/pathology/prepared --sft-size 2 --rl-size 6
    python tools/audit_judge.py configs/grpo.yaml judge=rule data=runs/pathology/prepared/rl.jsonl
"""

import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# (question, options, answer index, explanation)
ITEMS = [
    ("Which diagnosis best fits this skin lesion?",
     ["Basal cell carcinoma", "Squamous cell carcinoma", "Melanoma", "Seborrheic keratosis"], 0,
     "The image shows nests of basaloid cells with peripheral palisading and retraction clefts. Squamous cell "
     "carcinoma is unlikely because there are no keratin pearls, and melanoma is ruled out since the cells lack "
     "pigment. Seborrheic keratosis does not show infiltrative nests. Peripheral palisading with stromal "
     "retraction is characteristic of basal cell carcinoma."),
    ("What is the most likely diagnosis of this gastric biopsy?",
     ["Signet ring cell carcinoma", "Chronic gastritis", "Gastric lymphoma", "Gastrointestinal stromal tumour"], 0,
     "The section shows single cells with intracytoplasmic mucin pushing the nucleus to the periphery. Chronic "
     "gastritis is ruled out because the cells infiltrate the lamina propria, and lymphoma is unlikely since "
     "the cells contain mucin. A stromal tumour would show spindle cells, not mucin. Mucin that displaces the "
     "nucleus is the hallmark of signet ring cell carcinoma."),
    ("Which structure is seen in this lymph node?",
     ["Caseating granuloma", "Reactive follicle", "Metastatic carcinoma", "Sinus histiocytosis"], 0,
     "The field shows epithelioid histiocytes and Langhans giant cells around central necrosis. A reactive "
     "follicle is unlikely because there is no germinal centre, and metastatic carcinoma is excluded since no "
     "cohesive epithelial cells are present. Sinus histiocytosis does not form necrosis. Central caseous "
     "necrosis with giant cells is typical of a tuberculous granuloma."),
    ("What does this thyroid nodule show?",
     ["Papillary carcinoma", "Follicular adenoma", "Medullary carcinoma", "Hashimoto thyroiditis"], 0,
     "The image shows papillae lined by cells with optically clear, overlapping nuclei and nuclear grooves. "
     "Follicular adenoma is unlikely because it lacks these nuclear features, and medullary carcinoma is ruled "
     "out since there is no amyloid stroma. Hashimoto thyroiditis would show lymphoid follicles. Clear nuclei "
     "with grooves are diagnostic of papillary carcinoma."),
    ("Which lesion is shown in this breast core biopsy?",
     ["Fibroadenoma", "Invasive ductal carcinoma", "Phyllodes tumour", "Fat necrosis"], 0,
     "The image shows compressed ducts within a loose, uniform stroma with a well circumscribed border. "
     "Invasive ductal carcinoma is unlikely because the epithelium is not infiltrative, and a phyllodes tumour "
     "is excluded since the stroma is not hypercellular. Fat necrosis would show foamy macrophages. A "
     "circumscribed biphasic lesion with bland stroma is characteristic of fibroadenoma."),
    ("What is the most likely diagnosis of this liver biopsy?",
     ["Hepatocellular carcinoma", "Cirrhosis", "Metastatic adenocarcinoma", "Focal nodular hyperplasia"], 0,
     "The section shows thickened trabeculae of atypical hepatocytes with loss of the reticulin framework. "
     "Cirrhosis is unlikely because there are no fibrous septa around regenerative nodules, and metastatic "
     "adenocarcinoma is ruled out since the cells form trabeculae, not glands. Focal nodular hyperplasia has a "
     "central scar. Trabeculae more than three cells thick are a criterion for hepatocellular carcinoma."),
    ("Which finding is seen in this colon biopsy?",
     ["Tubular adenoma", "Hyperplastic polyp", "Ulcerative colitis", "Adenocarcinoma"], 0,
     "The image shows crypts lined by elongated, pencillate, hyperchromatic nuclei confined to the mucosa. A "
     "hyperplastic polyp is unlikely because its crypts are serrated without dysplasia, and ulcerative colitis "
     "is excluded since there are no crypt abscesses. Adenocarcinoma is ruled out because the glands do not "
     "invade the submucosa. Low grade dysplasia in tubular crypts defines a tubular adenoma."),
    ("What does this kidney biopsy show?",
     ["Clear cell renal cell carcinoma", "Oncocytoma", "Papillary renal cell carcinoma", "Angiomyolipoma"], 0,
     "The section shows nests of cells with clear cytoplasm separated by a delicate branching vascular "
     "network. Oncocytoma is unlikely because its cells have granular eosinophilic cytoplasm, and papillary "
     "carcinoma is ruled out since there are no papillae with foamy macrophages. Angiomyolipoma would contain "
     "fat and thick vessels. Clear cells in a capillary network are typical of clear cell carcinoma."),
    ("Which diagnosis fits this bone lesion?",
     ["Osteosarcoma", "Chondrosarcoma", "Ewing sarcoma", "Giant cell tumour"], 0,
     "The image shows pleomorphic malignant cells laying down lace-like osteoid. Chondrosarcoma is unlikely "
     "because the matrix is not cartilage, and Ewing sarcoma is excluded since its small round blue cells "
     "make no osteoid. A giant cell tumour shows evenly spread giant cells. Osteoid produced by malignant "
     "cells is the defining criterion of osteosarcoma."),
    ("What is seen in this lung biopsy?",
     ["Small cell carcinoma", "Squamous cell carcinoma", "Adenocarcinoma", "Carcinoid tumour"], 0,
     "The field shows sheets of small cells with scant cytoplasm, nuclear moulding and crush artefact. "
     "Squamous cell carcinoma is unlikely because there is no keratinisation, and adenocarcinoma is ruled "
     "out since no glands are formed. A carcinoid tumour has organoid nests and no necrosis. Nuclear moulding "
     "with a high mitotic rate is characteristic of small cell carcinoma."),
]


def build(root: Path) -> dict:
    """data.json (PubMed val, as PathMMU holds it) and images.zip (images/<sha256>.jpg) under root."""
    root.mkdir(parents=True, exist_ok=True)
    items, images = [], {}
    for no, (question, options, answer, explanation) in enumerate(ITEMS, 1):
        pixels = np.random.default_rng(no).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        name = hashlib.sha256(f"pathology item {no}".encode()).hexdigest() + ".jpg"
        images[name] = buffer.getvalue()
        # the correct option moves through the letters, as a real set's does
        order = [(answer + no + k) % len(options) for k in range(len(options))]
        lettered = [f"{'ABCD'[k]}) {options[i]}" for k, i in enumerate(order)]
        items.append({"No": no, "img": name, "question": question, "options": lettered,
                      "answer": lettered[order.index(answer)], "explanation": explanation})
    (root / "data.json").write_text(json.dumps({"PubMed": {"val": items}}, indent=1))
    with zipfile.ZipFile(root / "images.zip", "w") as z:
        for name, payload in images.items():
            z.writestr(f"images/{name}", payload)
    return {"data_json": str(root / "data.json"), "zip": str(root / "images.zip")}


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "pathology")))
