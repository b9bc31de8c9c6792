"""Results coming back from clients: admitted, judged, fetched and folded.

`validation` holds the whole decision "is this result acceptable" (message, job,
signature, claimed blob, fetched bytes, decoded update, late update) and the one
place rejections are logged and counted; `dispatcher` reads the results streams
and routes what `validation` admits to its slot; `fold` fetches an admitted
update's blob and folds it into a slot's aggregate. Imports run one way:
dispatcher and fold use validation, which uses neither; nothing here imports
the slot, the run context or this package's ``__init__``.
"""
