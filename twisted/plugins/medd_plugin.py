from twisted.application.service import ServiceMaker

medd = ServiceMaker("medd", "medd.tap", "medd: medical image routing node (central, viewer, gateway)", "medd")
