"""include/uapi/linux/liveupdate.h: the Live Update Orchestrator (/dev/liveupdate, sessions)."""

HEADER = r"""
#define LIVEUPDATE_IOCTL_TYPE 0xBA
#define LIVEUPDATE_SESSION_NAME_LENGTH 64

#define LIVEUPDATE_CMD_BASE 0x00
#define LIVEUPDATE_CMD_CREATE_SESSION 0x00
#define LIVEUPDATE_CMD_RETRIEVE_SESSION 0x01
#define LIVEUPDATE_CMD_SESSION_BASE 0x40
#define LIVEUPDATE_CMD_SESSION_PRESERVE_FD 0x40
#define LIVEUPDATE_CMD_SESSION_RETRIEVE_FD 0x41
#define LIVEUPDATE_CMD_SESSION_FINISH 0x42
#define LIVEUPDATE_CMD_SESSION_GET_NAME 0x43

struct liveupdate_ioctl_create_session {
    uint32_t size;
    int32_t fd;
    uint8_t name[64];
};
#define LIVEUPDATE_IOCTL_CREATE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)

struct liveupdate_ioctl_retrieve_session {
    uint32_t size;
    int32_t fd;
    uint8_t name[64];
};
#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION)

struct liveupdate_session_preserve_fd {
    uint32_t size;
    int32_t fd;
    uint64_t token;
};
#define LIVEUPDATE_SESSION_PRESERVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD)

struct liveupdate_session_retrieve_fd {
    uint32_t size;
    int32_t fd;
    uint64_t token;
};
#define LIVEUPDATE_SESSION_RETRIEVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)

struct liveupdate_session_finish {
    uint32_t size;
    uint32_t reserved;
};
#define LIVEUPDATE_SESSION_FINISH _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH)

struct liveupdate_session_get_name {
    uint32_t size;
    uint32_t reserved;
    uint8_t name[64];
};
#define LIVEUPDATE_SESSION_GET_NAME _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME)
"""
