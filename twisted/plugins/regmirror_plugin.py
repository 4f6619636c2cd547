from twisted.application.service import ServiceMaker

regmirror = ServiceMaker(
    "regmirror",
    "regmirror.service",
    "A pull-through cache for container registries",
    "regmirror",
)
