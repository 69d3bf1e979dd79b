from django.db import connection, transaction
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from outbox_bridge import publish

from .models import Order


@csrf_exempt  # an API endpoint of the example: no form, no CSRF token
@require_POST
def create_order(request):
    with transaction.atomic():  # the order and its message commit together
        order = Order.objects.create(total=request.POST["total"])
        publish(
            connection,
            "orders",
            {"id": order.id, "total": str(order.total)},
            key=f"order-{order.id}",
            headers={"type": "OrderCreated"},
        )
    return JsonResponse({"id": order.id}, status=201)
