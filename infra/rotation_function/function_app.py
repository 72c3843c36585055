"""Azure Functions app (Python v2 programming model): rotate the APIM subscription key on near-expiry.

Event Grid (Key Vault system topic, ``Microsoft.KeyVault.SecretNearExpiry`` filtered to the one secret)
delivers here; the logic lives in :mod:`rotation_handler` so it can be tested without the Functions runtime.
The function's name is the ``/functions/<name>`` part of the Event Grid destination in
``infra/modules/rotation.bicep`` (parameter ``functionName``).
"""

from __future__ import annotations

import azure.functions as func
from rotation_handler import event_to_dict, handle_event

FUNCTION_NAME = "rotate_apim_key"

app = func.FunctionApp()


@app.function_name(name=FUNCTION_NAME)
@app.event_grid_trigger(arg_name="event")
def rotate_apim_key(event: func.EventGridEvent) -> None:
    handle_event(event_to_dict(event))
