"""Azure Functions app (Python v2 programming model): rotate the APIM subscription key on near-expiry.

Event Grid (Key Vault system topic, ``Microsoft.KeyVault.SecretNearExpiry`` filtered to the one secret)
writes each event to the Storage queue ``apimvault-rotation-events`` on the function's own storage account
(``infra/modules/rotation.bicep``); this queue trigger runs the rotation. Event Grid's delivery is answered
as soon as the message is stored, so a rotation that waits minutes for the gateways never times it out.
The connection ``AzureWebJobsStorage`` is the host's own, identity-based in Azure
(``AzureWebJobsStorage__accountName`` / ``__credential`` / ``__clientId``). Retries, the poison queue and the
visibility timeout are host.json's ``extensions.queues``. The logic lives in the package,
:mod:`apimvault.rotation.function` (in the wheel; the drill runs it too), so it can be tested without the
Functions runtime.
"""

from __future__ import annotations

import azure.functions as func

from apimvault.rotation.function import ROTATION_QUEUE, handle_queue_message

FUNCTION_NAME = "rotate_apim_key"
QUEUE_CONNECTION = "AzureWebJobsStorage"

app = func.FunctionApp()


@app.function_name(name=FUNCTION_NAME)
@app.queue_trigger(arg_name="msg", queue_name=ROTATION_QUEUE, connection=QUEUE_CONNECTION)
def rotate_apim_key(msg: func.QueueMessage) -> None:
    handle_queue_message(msg.get_body(), message_id=msg.id, dequeue_count=msg.dequeue_count)
