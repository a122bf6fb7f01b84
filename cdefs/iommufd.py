"""include/uapi/linux/iommufd.h: /dev/iommu objects, IO address spaces, HW page tables.

Covered: DESTROY, IOAS_ALLOC / ALLOW_IOVAS / COPY / IOVA_RANGES / MAP / MAP_FILE / UNMAP,
OPTION, VFIO_IOAS, HWPT_ALLOC, GET_HW_INFO (+ the Intel VT-d, ARM SMMUv3 and AMD info
payloads) and all their flags and enums.
"""

HEADER = r"""
#define IOMMUFD_TYPE (';')

#define IOMMUFD_CMD_BASE 0x80
#define IOMMUFD_CMD_DESTROY 0x80
#define IOMMUFD_CMD_IOAS_ALLOC 0x81
#define IOMMUFD_CMD_IOAS_ALLOW_IOVAS 0x82
#define IOMMUFD_CMD_IOAS_COPY 0x83
#define IOMMUFD_CMD_IOAS_IOVA_RANGES 0x84
#define IOMMUFD_CMD_IOAS_MAP 0x85
#define IOMMUFD_CMD_IOAS_UNMAP 0x86
#define IOMMUFD_CMD_OPTION 0x87
#define IOMMUFD_CMD_VFIO_IOAS 0x88
#define IOMMUFD_CMD_HWPT_ALLOC 0x89
#define IOMMUFD_CMD_GET_HW_INFO 0x8a
#define IOMMUFD_CMD_IOAS_MAP_FILE 0x8f

struct iommu_destroy {
    uint32_t size;
    uint32_t id;
};
#define IOMMU_DESTROY _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY)

struct iommu_ioas_alloc {
    uint32_t size;
    uint32_t flags;
    uint32_t out_ioas_id;
};
#define IOMMU_IOAS_ALLOC _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC)

struct iommu_iova_range {
    uint64_t start;
    uint64_t last;
};

struct iommu_ioas_iova_ranges {
    uint32_t size;
    uint32_t ioas_id;
    uint32_t num_iovas;
    uint32_t __reserved;
    uint64_t allowed_iovas;
    uint64_t out_iova_alignment;
};
#define IOMMU_IOAS_IOVA_RANGES _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES)

struct iommu_ioas_allow_iovas {
    uint32_t size;
    uint32_t ioas_id;
    uint32_t num_iovas;
    uint32_t __reserved;
    uint64_t allowed_iovas;
};
#define IOMMU_IOAS_ALLOW_IOVAS _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOW_IOVAS)

#define IOMMU_IOAS_MAP_FIXED_IOVA (1 << 0)
#define IOMMU_IOAS_MAP_WRITEABLE (1 << 1)
#define IOMMU_IOAS_MAP_READABLE (1 << 2)

struct iommu_ioas_map {
    uint32_t size;
    uint32_t flags;
    uint32_t ioas_id;
    uint32_t __reserved;
    uint64_t user_va;
    uint64_t length;
    uint64_t iova;
};
#define IOMMU_IOAS_MAP _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP)

struct iommu_ioas_map_file {
    uint32_t size;
    uint32_t flags;
    uint32_t ioas_id;
    int32_t fd;
    uint64_t start;
    uint64_t length;
    uint64_t iova;
};
#define IOMMU_IOAS_MAP_FILE _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE)

struct iommu_ioas_copy {
    uint32_t size;
    uint32_t flags;
    uint32_t dst_ioas_id;
    uint32_t src_ioas_id;
    uint64_t length;
    uint64_t dst_iova;
    uint64_t src_iova;
};
#define IOMMU_IOAS_COPY _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_COPY)

struct iommu_ioas_unmap {
    uint32_t size;
    uint32_t ioas_id;
    uint64_t iova;
    uint64_t length;
};
#define IOMMU_IOAS_UNMAP _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP)

#define IOMMU_OPTION_RLIMIT_MODE 0
#define IOMMU_OPTION_HUGE_PAGES 1
#define IOMMU_OPTION_OP_SET 0
#define IOMMU_OPTION_OP_GET 1

struct iommu_option {
    uint32_t size;
    uint32_t option_id;
    uint16_t op;
    uint16_t __reserved;
    uint32_t object_id;
    uint64_t val64;
};
#define IOMMU_OPTION _IO(IOMMUFD_TYPE, IOMMUFD_CMD_OPTION)

#define IOMMU_VFIO_IOAS_GET 0
#define IOMMU_VFIO_IOAS_SET 1
#define IOMMU_VFIO_IOAS_CLEAR 2

struct iommu_vfio_ioas {
    uint32_t size;
    uint32_t ioas_id;
    uint16_t op;
    uint16_t __reserved;
};
#define IOMMU_VFIO_IOAS _IO(IOMMUFD_TYPE, IOMMUFD_CMD_VFIO_IOAS)

#define IOMMU_HWPT_ALLOC_NEST_PARENT (1 << 0)
#define IOMMU_HWPT_ALLOC_DIRTY_TRACKING (1 << 1)
#define IOMMU_HWPT_FAULT_ID_VALID (1 << 2)
#define IOMMU_HWPT_ALLOC_PASID (1 << 3)

#define IOMMU_HWPT_DATA_NONE 0
#define IOMMU_HWPT_DATA_VTD_S1 1
#define IOMMU_HWPT_DATA_ARM_SMMUV3 2
#define IOMMU_HWPT_DATA_AMD_GUEST 3

struct iommu_hwpt_alloc {
    uint32_t size;
    uint32_t flags;
    uint32_t dev_id;
    uint32_t pt_id;
    uint32_t out_hwpt_id;
    uint32_t __reserved;
    uint32_t data_type;
    uint32_t data_len;
    uint64_t data_uptr;
    uint32_t fault_id;
    uint32_t __reserved2;
};
#define IOMMU_HWPT_ALLOC _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC)

#define IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17 (1 << 0)
struct iommu_hw_info_vtd {
    uint32_t flags;
    uint32_t __reserved;
    uint64_t cap_reg;
    uint64_t ecap_reg;
};

struct iommu_hw_info_arm_smmuv3 {
    uint32_t flags;
    uint32_t __reserved;
    uint32_t idr[6];
    uint32_t iidr;
    uint32_t aidr;
};

struct iommu_hw_info_amd {
    uint64_t efr;
    uint64_t efr2;
};

#define IOMMU_HW_INFO_TYPE_NONE 0
#define IOMMU_HW_INFO_TYPE_DEFAULT 0
#define IOMMU_HW_INFO_TYPE_INTEL_VTD 1
#define IOMMU_HW_INFO_TYPE_ARM_SMMUV3 2
#define IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV 3
#define IOMMU_HW_INFO_TYPE_AMD 4

#define IOMMU_HW_CAP_DIRTY_TRACKING (1 << 0)
#define IOMMU_HW_CAP_PCI_PASID_EXEC (1 << 1)
#define IOMMU_HW_CAP_PCI_PASID_PRIV (1 << 2)
#define IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED (1 << 3)

#define IOMMU_HW_INFO_FLAG_INPUT_TYPE (1 << 0)

struct iommu_hw_info {
    uint32_t size;
    uint32_t flags;
    uint32_t dev_id;
    uint32_t data_len;
    uint64_t data_uptr;
    union {
        uint32_t in_data_type;
        uint32_t out_data_type;
    };
    uint8_t out_max_pasid_log2;
    uint8_t __reserved[3];
    uint64_t out_capabilities;
};
#define IOMMU_GET_HW_INFO _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO)
"""
