"""Reviews of generated pairs by pathologists: their storage (``store``), how they count in exports (``apply_reviews``)
and in the factory report (``report``)."""
