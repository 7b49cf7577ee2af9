#!/usr/bin/env python3
"""Write two small, realistic source trees for the demo (a reception desk and a doctor's office)."""

import os
import random
import sys

PATIENTS = ["Dupont Jeanne", "Lefèvre Hélène", "Müller Jürgen", "N'Diaye Aïssatou", "Martin Zoë"]
WORDS = ["patient", "patiente", "consultation", "tension", "artérielle", "traitement", "poursuivi", "contrôle", "échographie", "résultat", "normal", "douleur", "épaule", "genou", "ordonnance", "renouvelée"]


def text(r: random.Random, n: int) -> str:
    return "\n".join(" ".join(r.choice(WORDS) for _ in range(12)) for _ in range(n)) + "\n"


def main(reception: str, cabinet: str) -> None:
    r = random.Random(2026)
    for p in PATIENTS:
        d = os.path.join(cabinet, "Patients", p)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "Courrier 2026-08-28.txt"), "w") as f:
            f.write(f"Cher confrère,\nJe vous adresse {p}.\n" + text(r, 4))
        with open(os.path.join(d, "Radio thorax.dcm"), "wb") as f:
            f.write(r.randbytes(r.randrange(200_000, 600_000)))
    os.makedirs(os.path.join(reception, "Agenda"), exist_ok=True)
    with open(os.path.join(reception, "Agenda", "Rendez-vous septembre.csv"), "w") as f:
        f.write("date;patient\n" + "".join(f"2026-09-{d:02d};{r.choice(PATIENTS)}\n" for d in range(1, 29)))
    os.makedirs(os.path.join(reception, "Comptabilité"), exist_ok=True)
    with open(os.path.join(reception, "Comptabilité", "Relevé 2026-08.pdf"), "wb") as f:
        f.write(r.randbytes(150_000))
    os.symlink("Agenda/Rendez-vous septembre.csv", os.path.join(reception, "agenda-du-mois"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
