"""bb-worker: an HTTP service that turns a Noir witness into an UltraHonk proof with bb.

Layers, each importing only those below it (tests/test_layers.py checks it):

    web/        the WSGI app: routes, bodies, admission, readiness, callers (tokens, CORS, ids)
    server/     gunicorn: the worker, its hooks, the scheduler shared by workers, run dirs, metrics, logs
    bbrunner/   the prover: bb, circuits, VKs, witness and ACIR formats; knows no HTTP
    errors, settings, files    the error model, the settings object, files that are ours

Entry points at the repository root: app.py (`application`) and gunicorn.conf.py.
"""
