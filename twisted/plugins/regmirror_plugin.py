from twisted.application.service import ServiceMaker

regmirror = ServiceMaker(
    "regmirror",
    "regmirror.app.service",
    "A pull-through cache for container registries",
    "regmirror",
)
