"""Policy checks over ``infra/`` for what checkov does not check (or checks vacuously), as a tool:

    python -m infra.checks            # every check over the real templates; findings printed, exit 1 if any

* :mod:`.bicep`: parsing (pycep, the parser checkov's Bicep runner uses, cached on disk) and the model.
* :mod:`.bicep_policy`: every Bicep check, by concern: :mod:`.keyvault`, :mod:`.roles`, :mod:`.outputs`,
  :mod:`.apim`, :mod:`.function_app`, :mod:`.alerts`.
* :mod:`.type_check`: resource blocks against Azure's published resource types (:mod:`.bicep_types`).
* :mod:`.apim_policy`: the APIM policy XML documents and their C# expressions.
* :mod:`.kql_mini`: a small KQL interpreter the alert-query tests run the templates' queries with.

Each check returns a list of findings (strings); an empty list means compliant. ``tests/infra/`` runs them
over the real templates and over deliberately bad snippets, so every check is shown to be able to fail. Not
in the wheel; needs the ``dev`` extra (pycep-parser).
"""
