"""``pathgen serve``: a web browser over the store where pathologists look at slides, patches and pairs, and review
(accept, reject, correct) the pairs. ``app.create_app`` builds it; pathgen/cli/serve.py runs it."""
