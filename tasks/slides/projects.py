"""A slide's TCGA project, which picks its attribute prompts (``tasks.selection.retrieval``) and enters its
extraction hash (``tasks.slides.hashing.slide_project``, the one function every caller resolves it through).

In order, the first that names one: the settings (``slides.projects[<slide_id>]``, then ``slides.project``), the
source's GDC metadata (the ``project_id`` / ``Project ID`` column of a GDC manifest or sample sheet, read by
``tasks.slides.sources``), and the TCGA barcode in the slide id or file name (``TCGA-<TSS>-<participant>...``),
whose tissue source site (TSS) code names the study the site collected for. A code listed for several projects,
or for a study that is no GDC project (cell line controls, "Miscellaneous"), names none: such a slide gets the
generic prompts, and the reason is logged.

The code table, ``data/tcga_tissue_source_sites.csv``, is the GDC's "Tissue Source Site Codes" table
(https://gdc.cancer.gov/resources-tcga-users/tcga-code-tables/tissue-source-site-codes), copied byte for byte from
the copy NCI-GDC published in its data model repository: github.com/NCI-GDC/gdcdatamodel, file
``zug/datamodel/tissueSourceSite.csv`` at commit 144edbe7f61a36e24c333d82f096677bc66e5a60 (January 2015, the
file's last version there; 1,052 codes; columns "TSS Code", "Source Site", "Study Name", "BCR"). A study name
maps to its GDC project id by the GDC's "TCGA Study Abbreviations" table
(https://gdc.cancer.gov/resources-tcga-users/tcga-code-tables/tcga-study-abbreviations): ``STUDY_PROJECTS``.
Every barcode of the released PathGen-1.6M sample resolves with it (tests/test_projects.py).
"""

from __future__ import annotations

import csv
import posixpath
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pathgen.settings import Settings
from tasks.slides.sources import SlideRef

TSS_TABLE = Path(__file__).parent / "data" / "tcga_tissue_source_sites.csv"
# The participant part is 4 characters; what follows (sample, portion, a GDC file name's UUID) is not needed.
BARCODE = re.compile(r"(?<![A-Za-z0-9])TCGA-([A-Za-z0-9]{2})-[A-Za-z0-9]{4}(?![A-Za-z0-9])")

# Study name (lower case, as in the TSS table) -> GDC project id, from the TCGA Study Abbreviations table.
STUDY_PROJECTS: dict[str, str | None] = {
    "acute myeloid leukemia": "TCGA-LAML",
    "adrenocortical carcinoma": "TCGA-ACC",
    "bladder urothelial carcinoma": "TCGA-BLCA",
    "brain lower grade glioma": "TCGA-LGG",
    "breast invasive carcinoma": "TCGA-BRCA",
    "cervical squamous cell carcinoma and endocervical adenocarcinoma": "TCGA-CESC",
    "cholangiocarcinoma": "TCGA-CHOL",
    "colon adenocarcinoma": "TCGA-COAD",
    "esophageal carcinoma": "TCGA-ESCA",
    "glioblastoma multiforme": "TCGA-GBM",
    "head and neck squamous cell carcinoma": "TCGA-HNSC",
    "kidney chromophobe": "TCGA-KICH",
    "kidney renal clear cell carcinoma": "TCGA-KIRC",
    "kidney renal papillary cell carcinoma": "TCGA-KIRP",
    "liver hepatocellular carcinoma": "TCGA-LIHC",
    "lung adenocarcinoma": "TCGA-LUAD",
    "lung squamous cell carcinoma": "TCGA-LUSC",
    "lymphoid neoplasm diffuse large b-cell lymphoma": "TCGA-DLBC",
    "mesothelioma": "TCGA-MESO",
    "ovarian serous cystadenocarcinoma": "TCGA-OV",
    "pancreatic adenocarcinoma": "TCGA-PAAD",
    "pheochromocytoma and paraganglioma": "TCGA-PCPG",
    "prostate adenocarcinoma": "TCGA-PRAD",
    "rectum adenocarcinoma": "TCGA-READ",
    "sarcoma": "TCGA-SARC",
    "skin cutaneous melanoma": "TCGA-SKCM",
    "stomach adenocarcinoma": "TCGA-STAD",
    "testicular germ cell tumors": "TCGA-TGCT",
    "thymoma": "TCGA-THYM",
    "thyroid carcinoma": "TCGA-THCA",
    "uterine carcinosarcoma": "TCGA-UCS",
    "uterine corpus endometrial carcinoma": "TCGA-UCEC",
    "uveal melanoma": "TCGA-UVM",
    # Study abbreviations CNTL and MISC: no GDC project, so no project prompts.
    "cell line control": None,
    "miscellaneous": None,
}


@dataclass(frozen=True)
class SiteProjects:
    """What one TSS code names: its projects (None for a study that is no GDC project) and its studies."""

    code: str
    projects: frozenset[str | None]
    studies: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedProject:
    """A slide's project, where it came from (``slides.projects``, ``slides.project``, ``source metadata``,
    ``barcode`` or ``none``) and, when none was taken from a barcode, why."""

    project: str | None
    source: str
    note: str = ""


def load_sites(path: str | Path = TSS_TABLE) -> dict[str, SiteProjects]:
    """TSS code -> what it names, from a table in the GDC's layout; a study name not in ``STUDY_PROJECTS`` is an
    error naming the file (it would otherwise silently give its slides the generic prompts)."""
    found: dict[str, tuple[set[str | None], list[str]]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"TSS Code", "Study Name"} <= set(rows[0]):
        raise ValueError(f"{path} is not a TSS code table: it needs the columns 'TSS Code' and 'Study Name'")
    for row in rows:
        code, study = row["TSS Code"].strip().upper(), " ".join(row["Study Name"].split())
        if study.lower() not in STUDY_PROJECTS:
            raise ValueError(
                f"{path}: TSS code {code} names the study {study!r}, which has no GDC project in STUDY_PROJECTS; "
                "add it there from https://gdc.cancer.gov/resources-tcga-users/tcga-code-tables/tcga-study-abbreviations"
            )
        projects, studies = found.setdefault(code, (set(), []))
        projects.add(STUDY_PROJECTS[study.lower()])
        studies.append(study)
    return {code: SiteProjects(code, frozenset(p), tuple(s)) for code, (p, s) in found.items()}


@lru_cache(maxsize=1)
def _shipped_sites() -> dict[str, SiteProjects]:
    return load_sites(TSS_TABLE)


def barcode_project(names: list[str], sites: dict[str, SiteProjects] | None = None) -> ResolvedProject:
    """The project the first TCGA barcode among ``names`` (slide id, file name) names by its TSS code."""
    sites = _shipped_sites() if sites is None else sites
    for name in names:
        match = BARCODE.search(name or "")
        if match is None:
            continue
        code = match.group(1).upper()
        site = sites.get(code)
        if site is None:
            return ResolvedProject(None, "none", f"TSS code {code} of {match.group(0)} is not in the GDC's TSS table")
        named = sorted(p for p in site.projects if p)
        if len(site.projects) > 1:
            studies = "; ".join(site.studies)
            return ResolvedProject(None, "none", f"TSS code {code} is listed for several studies ({studies})")
        if not named:
            return ResolvedProject(None, "none", f"TSS code {code} is a {site.studies[0]!r} site, no GDC project")
        return ResolvedProject(named[0], "barcode", f"TSS code {code} of {match.group(0)}")
    return ResolvedProject(None, "none", "no TCGA barcode in its id or file name")


def resolve_project(ref: SlideRef, settings: Settings) -> ResolvedProject:
    """The slide's project by the order in the module docstring."""
    cfg = settings.slides
    if ref.slide_id in cfg.projects:
        return ResolvedProject(cfg.projects[ref.slide_id], "slides.projects")
    if cfg.project:
        return ResolvedProject(cfg.project, "slides.project")
    if ref.project and ref.project.strip():
        return ResolvedProject(ref.project.strip(), "source metadata")
    return barcode_project([ref.slide_id, posixpath.basename(str(ref.uri).replace("\\", "/"))])
